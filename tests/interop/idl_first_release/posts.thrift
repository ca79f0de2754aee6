// The Posts service. Every method's first argument is the caller's access
// token, checked before anything else.

include "common.thrift"

struct Post {
  1: i64 id
  // The token's subject.
  2: string author
  3: string title
  4: string body
  // Unix milliseconds.
  5: i64 created_at
  6: i64 updated_at
}

struct PostPage {
  // Newest first.
  1: list<Post> posts
  // 0 when there is no next page.
  2: i64 next_before_id
}

service Posts {
  // Scope posts:write.
  Post create_post(1: string token, 2: string title, 3: string body)
    throws (1: common.Unauthenticated unauthenticated,
            2: common.PermissionDenied permission_denied,
            3: common.InvalidArgument invalid_argument,
            4: common.Unavailable unavailable)

  // Scope posts:read.
  Post get_post(1: string token, 2: i64 post_id)
    throws (1: common.Unauthenticated unauthenticated,
            2: common.PermissionDenied permission_denied,
            3: common.InvalidArgument invalid_argument,
            4: common.Unavailable unavailable,
            5: common.NotFound not_found)

  // Scope posts:read. limit 0 means 20; 1..100 allowed. before_id 0 means
  // from the newest.
  PostPage list_posts(1: string token, 2: i32 limit, 3: i64 before_id)
    throws (1: common.Unauthenticated unauthenticated,
            2: common.PermissionDenied permission_denied,
            3: common.InvalidArgument invalid_argument,
            4: common.Unavailable unavailable)

  // Scope posts:write for one's own posts, posts:admin for anyone's.
  Post update_post(1: string token, 2: i64 post_id, 3: string title, 4: string body)
    throws (1: common.Unauthenticated unauthenticated,
            2: common.PermissionDenied permission_denied,
            3: common.InvalidArgument invalid_argument,
            4: common.Unavailable unavailable,
            5: common.NotFound not_found)

  // Scope posts:write for one's own posts, posts:admin for anyone's.
  void delete_post(1: string token, 2: i64 post_id)
    throws (1: common.Unauthenticated unauthenticated,
            2: common.PermissionDenied permission_denied,
            3: common.InvalidArgument invalid_argument,
            4: common.Unavailable unavailable,
            5: common.NotFound not_found)
}
