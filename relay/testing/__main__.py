"""python -m relay.testing: run the fake upstream (same as relay.testing.fake_upstream)."""

from relay.testing.fake_upstream import main

raise SystemExit(main())
