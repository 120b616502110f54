"""The ORM models and the Alembic migrations agree, on SQLite and PostgreSQL, and 0003_i downgrades cleanly."""

from __future__ import annotations

from alembic import command

from shared.migrate import alembic_config, downgrade, upgrade


def test_models_and_migrations_agree(database_url: str) -> None:
    command.check(alembic_config(database_url))  # raises if autogenerate would emit anything


def test_the_integration_migration_downgrades_and_upgrades(database_url: str) -> None:
    downgrade(database_url, "0002")
    upgrade(database_url)
    command.check(alembic_config(database_url))
