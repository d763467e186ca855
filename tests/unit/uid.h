// Uid("alice"): a UserId for tests that name their users by literals. Ids are
// made only by parsing (user_id.h), and a test's own literal is valid, so a
// typo ends the test at once rather than reaching an adapter.
#pragma once

#include <string_view>

#include "chatd/user_id.h"

namespace chatd::testing {

inline UserId Uid(std::string_view id) { return UserId::Parse(id).value(); }

}  // namespace chatd::testing
