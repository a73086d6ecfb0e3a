#include <iostream>
#include <vector>

int main() {
    std::vector<int> v{1, 3};
    std::cout << "hello from cpp " << v[0] + v[1] << std::endl;
}
