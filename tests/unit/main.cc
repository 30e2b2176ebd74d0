// The Catch2 runner for unit_tests; the test cases live in the test_*.cc files.
#define CATCH_CONFIG_MAIN
#include <catch2/catch.hpp>
