// Errors shared by the Auth and Posts services.
//
// Every exception carries `1: string message`: human readable, and never
// containing a token, a password or a key.

// No token, malformed, bad signature, expired, not yet valid, wrong
// issuer/audience/type, revoked; or wrong username/password/client secret.
exception Unauthenticated {
  1: string message
}

// The caller is known but lacks the scope, or does not own the resource.
exception PermissionDenied {
  1: string message
}

// A request field is out of range or malformed; the message names the field.
exception InvalidArgument {
  1: string message
}

// No such resource.
exception NotFound {
  1: string message
}

// Something needed to decide (the Auth service, an introspection or JWKS
// endpoint, the database) is unreachable: the call is refused (fail closed),
// and retrying later may succeed.
exception Unavailable {
  1: string message
}

// Too many attempts; retry after `retry_after_ms` milliseconds.
exception RateLimited {
  1: string message
  2: i64 retry_after_ms
}
