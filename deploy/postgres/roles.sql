-- Kagzi's PostgreSQL roles: a migrator that owns the schema and runs the DDL, and a
-- runtime role for the services with only the DML they need and timeouts that bound
-- what a stuck statement or a forgotten transaction can hold.
--
-- Run it with psql, as a superuser, connected to Kagzi's database, before the first
-- migration and again after it (and after any migration, to be safe); it is idempotent:
--
--   psql "postgres://postgres@db:5432/kagzi" -v ON_ERROR_STOP=1 -f deploy/postgres/roles.sql
--   MIGRATION_DATABASE_URL=postgres://kagzi_migrator:…@db:5432/kagzi kagzi migrate
--   psql "postgres://postgres@db:5432/kagzi" -v ON_ERROR_STOP=1 -f deploy/postgres/roles.sql
--
-- Names and timeouts can be changed with psql variables (-v runtime=kagzi_app …); the
-- defaults are below. Passwords are not set here, so none ends up in a file or in
-- shell history: set them with psql's \password.
--
-- Roles are cluster-wide; everything else here applies to the current database only.

\set ON_ERROR_STOP on
\if :{?migrator}
\else
\set migrator kagzi_migrator
\endif
\if :{?runtime}
\else
\set runtime kagzi_runtime
\endif
\if :{?statement_timeout}
\else
\set statement_timeout 30s
\endif
\if :{?lock_timeout}
\else
\set lock_timeout 5s
\endif
\if :{?idle_in_transaction_session_timeout}
\else
\set idle_in_transaction_session_timeout 1min
\endif

BEGIN;

-- Login roles with no attributes beyond LOGIN: not superuser, no CREATEDB, CREATEROLE,
-- REPLICATION or BYPASSRLS, and nothing inherited.
SELECT format('CREATE ROLE %I LOGIN NOINHERIT', :'migrator')
WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = :'migrator') \gexec
SELECT format('CREATE ROLE %I LOGIN NOINHERIT', :'runtime')
WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = :'runtime') \gexec
ALTER ROLE :"migrator" NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS;
ALTER ROLE :"runtime" NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS;

-- Only Kagzi's roles connect to Kagzi's database, and nobody makes temporary tables in it.
SELECT format('REVOKE ALL ON DATABASE %I FROM PUBLIC', current_database()) \gexec
SELECT format('GRANT CONNECT ON DATABASE %I TO %I, %I', current_database(), :'migrator', :'runtime') \gexec

-- Kagzi's tables live in the public schema. The migrator owns it and everything in it
-- (a database migrated before these roles existed hands its tables over), so only the
-- migrator can create, alter, drop or truncate.
REVOKE ALL ON SCHEMA public FROM PUBLIC;
ALTER SCHEMA public OWNER TO :"migrator";
SELECT format('ALTER TABLE %I.%I OWNER TO %I', schemaname, tablename, :'migrator')
FROM pg_tables WHERE schemaname = 'public' AND tableowner <> :'migrator' \gexec
SELECT format('ALTER SEQUENCE %I.%I OWNER TO %I', schemaname, sequencename, :'migrator')
FROM pg_sequences WHERE schemaname = 'public' AND sequenceowner <> :'migrator' \gexec

-- The runtime role reads and writes rows, nothing else: no TRUNCATE, REFERENCES or
-- TRIGGER, no DDL. Tables a later migration creates get the same grants by default.
GRANT USAGE ON SCHEMA public TO :"runtime";
GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO :"runtime";
GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO :"runtime";
ALTER DEFAULT PRIVILEGES FOR ROLE :"migrator" IN SCHEMA public
    GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO :"runtime";
ALTER DEFAULT PRIVILEGES FOR ROLE :"migrator" IN SCHEMA public
    GRANT USAGE ON SEQUENCES TO :"runtime";

-- The schema version belongs to migrations: the runtime role only reads it (the services'
-- schema check). It exists after the first migration, hence the second run.
SELECT format('REVOKE INSERT, UPDATE, DELETE ON public.goose_db_version FROM %I', :'runtime')
WHERE to_regclass('public.goose_db_version') IS NOT NULL \gexec
SELECT format('REVOKE ALL ON SEQUENCE public.%I FROM %I', sequencename, :'runtime')
FROM pg_sequences WHERE schemaname = 'public' AND sequencename LIKE 'goose\_db\_version%' \gexec

-- Every query of the services is short; these bound a runaway statement, a wait on a
-- lock and a transaction left open by a stuck process. A session may lower them (or
-- raise them: PostgreSQL lets a role change its own settings); they are the defaults
-- every new connection of the role starts with.
ALTER ROLE :"runtime" SET statement_timeout = :'statement_timeout';
ALTER ROLE :"runtime" SET lock_timeout = :'lock_timeout';
ALTER ROLE :"runtime" SET idle_in_transaction_session_timeout = :'idle_in_transaction_session_timeout';

COMMIT;
