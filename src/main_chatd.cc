#include <cstdio>
int main() { std::fprintf(stderr, "chatd: skeleton\n"); return 1; }
