// An example service of your own, protected by thrift-token-auth.
//
// Every method that needs a caller takes its access token (here `1: string
// token`) and declares the errors the token guard can raise: Unauthenticated,
// PermissionDenied and Unavailable, from the package's common.thrift.

namespace py notes
namespace java com.example.notes
namespace cpp example.notes

include "common.thrift"

struct Note {
  1: i64 id
  2: string owner
  3: string text
}

service Notes {
  Note add_note(1: string token, 2: string text)
    throws (1: common.Unauthenticated unauthenticated,
            2: common.PermissionDenied permission_denied,
            3: common.Unavailable unavailable,
            4: common.InvalidArgument invalid_argument)

  Note get_note(1: string token, 2: i64 id)
    throws (1: common.Unauthenticated unauthenticated,
            2: common.PermissionDenied permission_denied,
            3: common.Unavailable unavailable,
            4: common.NotFound not_found)

  list<Note> list_notes(1: string token, 2: i32 limit)
    throws (1: common.Unauthenticated unauthenticated,
            2: common.PermissionDenied permission_denied,
            3: common.Unavailable unavailable,
            4: common.InvalidArgument invalid_argument)

  // No token: a health check for load balancers.
  string health()
}
