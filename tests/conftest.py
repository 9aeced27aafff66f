pytest_plugins = ["tests.support.pg_fixtures", "tests.support.questdb_server"]
