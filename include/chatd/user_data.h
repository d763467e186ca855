// A user's own data over the API (docs/api.md): the history a page at a time,
// the export of everything, the erase, and the automatic restore of an
// archived user on their first request.
//
// The history reads the user's turn index (chat:{u}:turns, every turn in time
// order, written by the record script and by restore and migrate) a page at a
// time, then each message where it lives: the recent list, the turns still
// queued for the indexer (found through chat:{u}:queued, not by scanning the
// shared stream), the hot set, and Chroma for the rest (one call by id). A
// page therefore costs a bounded number of Redis round trips and at most one
// Chroma call, whatever the size of the history. The erase and the restore
// are the cleanup's own (cleanup.h), shared with chatd-cleanup.
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "chatd/cleanup.h"
#include "chatd/memory.h"
#include "chatd/redis.h"
#include "chatd/status.h"
#include "chatd/user_id.h"

namespace chatd {

// The long-term store's adapter (src/chroma.h): held by reference here.
class ChromaStore;

inline constexpr int kHistoryDefaultLimit = 50;
inline constexpr int kHistoryMaxLimit = 200;
// Turns per page of an export (two messages each).
inline constexpr int kExportPageTurns = 100;

struct HistoryMessage {
  Role role = Role::kUser;
  std::string content;
  int64_t ts_ms = 0;
  std::string turn_id;
};

// A history cursor names the oldest message of the page before: its turn
// index member and its half. The next page holds what is older.
struct HistoryCursor {
  std::string member;  // TurnIndexMember
  Role role = Role::kUser;
};
// "<member>:u|a", opaque to clients.
std::string FormatCursor(const HistoryCursor& cursor);
// nullopt for anything FormatCursor cannot have made.
std::optional<HistoryCursor> ParseCursor(std::string_view text);

struct HistoryPage {
  std::vector<HistoryMessage> messages;  // oldest first
  std::optional<std::string> next;        // a cursor, when older messages exist
};

// {"messages":[{"role","content","at","turnId"}...],"next":<cursor or null>}
std::string HistoryBody(const HistoryPage& page);

// Brings an archived user's memory back on their first request. Thread-safe.
class ArchivedMemory {
 public:
  virtual ~ArchivedMemory() = default;
  // Restores the user if they have archives; returns the records restored (0
  // when there was nothing to restore). The archives stay until the restore
  // has landed, so a failure loses nothing and the next request retries.
  virtual Result<int64_t> RestoreIfArchived(const UserId& user_id) = 0;
};

// What the HTTP layer needs of a user's data; faked in unit tests. Thread-safe.
class UserDataStore : public ArchivedMemory {
 public:
  // Newest page first, oldest first within the page; `limit` in 1..kHistoryMaxLimit.
  virtual Result<HistoryPage> History(const UserId& user_id, int limit,
                                      const std::optional<HistoryCursor>& before) = 0;
  // The user's whole data as one JSON document, handed to `write` a piece at a
  // time (a page of messages each), so it never has to fit in memory. `write`
  // returns false when the client went away; the export then stops.
  // A failure after the first piece leaves the document unfinished.
  virtual Status Export(const UserId& user_id, int64_t restored,
                        const std::function<bool(std::string_view)>& write) = 0;
  // Erases the user everywhere; the number of distinct messages erased.
  virtual Result<int64_t> Erase(const UserId& user_id) = 0;
};

// Thread-safe: every call uses only the thread-safe clients it borrows.
class UserData : public UserDataStore {
 public:
  UserData(RedisClient& redis, ChromaStore& chroma, Cleanup& cleanup, std::string archive_dir);

  Result<int64_t> RestoreIfArchived(const UserId& user_id) override;
  Result<HistoryPage> History(const UserId& user_id, int limit,
                              const std::optional<HistoryCursor>& before) override;
  Status Export(const UserId& user_id, int64_t restored,
                const std::function<bool(std::string_view)>& write) override;
  // The cleanup's erase (chatd-cleanup forget), keeping the rate-limit counters.
  Result<int64_t> Erase(const UserId& user_id) override;

 private:
  // The messages of these turns (index members), newest slot first as given.
  Result<std::vector<HistoryMessage>> Fetch(const UserId& user_id,
                                            const std::vector<std::pair<std::string, Role>>& slots);

  RedisClient& redis_;
  ChromaStore& chroma_;
  Cleanup& cleanup_;
  std::string archive_dir_;
};

}  // namespace chatd
