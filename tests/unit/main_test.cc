// The one translation unit that defines the Boost.Test module; every other
// tests/unit/*_test.cc only adds suites to it.
#define BOOST_TEST_MODULE chatd_unit
#include <boost/test/unit_test.hpp>
