// A tiny service for the serving-layer tests.

exception Oops {
  1: string message
}

struct Item {
  1: i64 id
  2: string name
  3: list<string> tags
  4: map<string, i64> counts
}

service Echo {
  string echo(1: string text)
  i64 add(1: i64 a, 2: i64 b)
  string hold(1: string text)
  void boom()
  string fail(1: string text) throws (1: Oops oops)
  oneway void ping()
  string whoami()
  Item item(1: Item item)
  string bad_reply()
  string peer()
}
