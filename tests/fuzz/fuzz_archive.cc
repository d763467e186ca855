// Archive files of chatd-cleanup (ParseArchive): read back at restore time,
// from a disk an operator may have edited or a crash may have cut short.
// Whatever parses must survive a write and a read unchanged.
#include "archive.h"
#include "fuzz_input.h"

namespace {

bool SameRecords(const std::vector<chatd::StoredMessage>& a, const std::vector<chatd::StoredMessage>& b) {
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); ++i) {
    const auto &x = a[i], &y = b[i];
    if (x.id != y.id || x.user_id != y.user_id || x.turn_id != y.turn_id || x.role != y.role ||
        x.content != y.content || x.ts_ms != y.ts_ms || x.embedding != y.embedding) {
      return false;
    }
  }
  return true;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace chatd;
  Result<Archive> archive = ParseArchive(fuzz::Bytes(data, size));
  if (!archive.ok()) return 0;
  Result<Archive> again = ParseArchive(SerializeArchive(*archive));
  fuzz::Require(again.ok(), "a parsed archive serializes to a valid one");
  fuzz::Require(again->user_id == archive->user_id && again->last_activity_ms == archive->last_activity_ms &&
                    again->archived_at_ms == archive->archived_at_ms && SameRecords(again->records, archive->records),
                "an archive survives a write and a read");
  return 0;
}
