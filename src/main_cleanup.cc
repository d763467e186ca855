// chatd-cleanup: archives and removes the memory of inactive users (issue 5).
#include <cstdio>

int main() {
  std::fprintf(stderr, "chatd-cleanup: not implemented yet\n");
  return 2;
}
