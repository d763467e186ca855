#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

#include <boost/test/unit_test.hpp>
#include <filesystem>
#include <fstream>
#include <string>

#include "chatd/archive.h"
#include "chatd/decimal.h"

using namespace chatd;

namespace {

// A fresh folder under /tmp, removed with what it holds.
class TempDir {
 public:
  TempDir() {
    char tmpl[] = "/tmp/chatd-archive-test-XXXXXX";
    path_ = ::mkdtemp(tmpl) ? tmpl : "";
  }
  ~TempDir() {
    std::error_code ignored;
    if (!path_.empty()) std::filesystem::remove_all(path_, ignored);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

void Touch(const std::string& path) { std::ofstream(path) << "{}"; }

}  // namespace

BOOST_AUTO_TEST_SUITE(archive)

BOOST_AUTO_TEST_CASE(decimal_parsing_is_strict_and_never_throws) {
  BOOST_TEST(ParseDecimal("0").value() == 0);
  BOOST_TEST(ParseDecimal("1700000000000").value() == 1700000000000);
  BOOST_TEST(ParseDecimal("9223372036854775807").value() == INT64_MAX);
  BOOST_TEST(!ParseDecimal("9223372036854775808"));  // one past int64
  BOOST_TEST(!ParseDecimal("99999999999999999999"));  // 20 digits
  for (const char* bad : {"", "-5", "+5", " 5", "5 ", "5x", "0x10", "1e3", "1.5"}) BOOST_TEST(!ParseDecimal(bad), bad);
}

// Issue 12: std::stoll on a 20-digit archive file name threw out of the
// cleanup. Such a name is not one of ours: skipped.
BOOST_AUTO_TEST_CASE(archive_file_name_of_twenty_digits_is_skipped_not_thrown) {
  BOOST_TEST(ArchiveFileStamp("1700000000000.json").value() == 1700000000000);
  BOOST_TEST(!ArchiveFileStamp("99999999999999999999.json"));
  BOOST_TEST(!ArchiveFileStamp("-5.json"));
  BOOST_TEST(!ArchiveFileStamp(".json"));
  BOOST_TEST(!ArchiveFileStamp("17.json.tmp"));
  BOOST_TEST(!ArchiveFileStamp("notes.json"));

  TempDir root;
  BOOST_REQUIRE(!root.path().empty());
  std::string dir = ArchiveUserDir(root.path(), "alice");
  BOOST_REQUIRE(::mkdir(dir.c_str(), 0700) == 0);
  for (const char* name : {"200.json", "99999999999999999999.json", "100.json", "x.json", "300.json.tmp"}) {
    Touch(dir + "/" + name);
  }
  Result<std::vector<std::string>> listed = ListArchives(root.path(), "alice");
  BOOST_REQUIRE(listed.ok());
  BOOST_REQUIRE(listed->size() == 2u);
  BOOST_TEST((*listed)[0] == dir + "/100.json");
  BOOST_TEST((*listed)[1] == dir + "/200.json");
}

BOOST_AUTO_TEST_SUITE_END()
