// The emulator's test programs' one check (selftest.cpp, cute_atoms_test.cpp):
// print the first 20 failed conditions with their message, count them all;
// main returns g_fail != 0. Test-only: no product header includes this.
#pragma once
#include <cstdio>

static int g_fail = 0;
#define CHECK(cond, ...)                   \
  do {                                     \
    if (!(cond)) {                         \
      if (g_fail < 20) {                   \
        std::printf("FAIL: " __VA_ARGS__); \
        std::printf("\n");                 \
      }                                    \
      ++g_fail;                            \
    }                                      \
  } while (0)
