#include <math.h>
#include <stdio.h>

int main(void) {
    printf("hello from c %d\n", (int)sqrt(16.0));
    return 0;
}
