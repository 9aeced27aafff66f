pytest_plugins = ["tests.pg_fixtures"]
