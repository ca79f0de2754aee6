// The Auth service: issues RFC 9068 JWT access tokens and rotating refresh
// tokens, validates and revokes them, and publishes its JWK Set.

include "common.thrift"

struct TokenPair {
  1: string access_token
  // Empty for client (service-to-service) tokens.
  2: string refresh_token
  // Always "Bearer".
  3: string token_type
  // Lifetime of the access token, in seconds.
  4: i64 expires_in
  // Granted scopes, space separated.
  5: string scope
}

struct Principal {
  1: string subject
  2: list<string> scopes
  // Unix seconds.
  3: i64 expires_at
  // The token's `jti`.
  4: string token_id
  5: string client_id
  // Added to the contract: the token's `iss`, and its `aud` (space separated
  // when several), so that a remote verifier can check both.
  6: optional string issuer
  7: optional string audience
}

service Auth {
  TokenPair login(1: string username, 2: string password)
    throws (1: common.Unauthenticated unauthenticated,
            2: common.RateLimited rate_limited,
            3: common.InvalidArgument invalid_argument,
            4: common.Unavailable unavailable)

  // Rotation: every call returns a new refresh token and retires the old one.
  TokenPair refresh(1: string refresh_token)
    throws (1: common.Unauthenticated unauthenticated,
            3: common.InvalidArgument invalid_argument,
            4: common.Unavailable unavailable)

  // OAuth 2.0 client credentials, for service-to-service calls.
  TokenPair client_token(1: string client_id, 2: string client_secret, 3: string scope)
    throws (1: common.Unauthenticated unauthenticated,
            2: common.RateLimited rate_limited,
            3: common.InvalidArgument invalid_argument,
            4: common.Unavailable unavailable)

  Principal validate(1: string token)
    throws (1: common.Unauthenticated unauthenticated,
            4: common.Unavailable unavailable)

  // Access or refresh token; idempotent, as RFC 7009.
  void revoke(1: string token)
    throws (3: common.InvalidArgument invalid_argument,
            4: common.Unavailable unavailable)

  // The JWK Set (RFC 7517) as JSON.
  string jwks()
}
