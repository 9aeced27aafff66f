"""The QuestDB pool actor (asyncpg over PostgreSQL wire inside trio-asyncio)."""
