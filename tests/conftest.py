pytest_plugins = ["tests.pg_fixtures", "tests.questdb_server"]
