import std.stdio;

void main() {
    writeln("hello from d ", 2 + 2);
}
