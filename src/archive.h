// Archive files of chatd-cleanup: a user's long-term memory, complete (ids,
// documents, metadata, embeddings), written crash-safely.
//
// Layout: <archive dir>/<collection name>/<last activity ms>.json, one file per
// time a user was archived. The name is deterministic, so a cleanup killed and
// run again rewrites the same file instead of adding another. Format
// (docs/cleanup.md): {"format":"chatd-archive/1","user":...,"collection":...,
// "last_activity_ms":...,"archived_at_ms":...,"records":[{"id","document",
// "metadata":{"role","ts","user","turn"},"embedding":[...]}]}. Floats are
// written with 9 significant digits, which round-trips every float exactly.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "chatd/memory.h"
#include "chatd/status.h"
#include "chatd/user_id.h"

namespace chatd {

struct Archive {
  // An archive is always some user's: the file names its user, parsed on read.
  explicit Archive(UserId user) : user_id(std::move(user)) {}

  UserId user_id;
  int64_t last_activity_ms = 0;
  int64_t archived_at_ms = 0;
  std::vector<StoredMessage> records;
};

std::string ArchiveUserDir(std::string_view archive_dir, const UserId& user_id);
std::string ArchivePath(std::string_view archive_dir, const UserId& user_id, int64_t last_activity_ms);

std::string SerializeArchive(const Archive& archive);
Result<Archive> ParseArchive(std::string_view json);

// Writes to a temporary file of its own (`<path>.<random>.tmp`, never shared
// with another writer), fsyncs it, renames it over `path` and fsyncs the
// folder (created if missing), so a crash leaves the old file or the new one,
// never half of one, and concurrent writers each leave a whole file.
Status WriteFileDurably(const std::string& path, std::string_view content);
Result<std::string> ReadFile(const std::string& path);
// The last-activity stamp in an archive file's name "<decimal ms>.json", or
// nullopt for any other name (a sign, other characters, more than int64 holds).
std::optional<int64_t> ArchiveFileStamp(std::string_view file_name);
// Every archive file of a user, oldest first, skipping names that are not
// archive names. No folder: empty.
Result<std::vector<std::string>> ListArchives(std::string_view archive_dir, const UserId& user_id);
// Removes files and then the user's folder, fsyncing the parent.
Status RemoveArchives(std::string_view archive_dir, const UserId& user_id, const std::vector<std::string>& paths);

// Union by id; on equal ids the later list wins.
std::vector<StoredMessage> MergeById(std::vector<StoredMessage> a, std::vector<StoredMessage> b);

}  // namespace chatd
