// Package testkit gives Kagzi's tests (and users' tests of their workflows) real
// infrastructure, isolated per test: a fresh PostgreSQL database cloned from a migrated
// template, and an in-process NATS server with JetStream in a temporary directory.
//
// The PostgreSQL server is KAGZI_TEST_DATABASE_URL (default: postgres@127.0.0.1:5432).
// Nothing here mocks PostgreSQL or NATS. KAGZI_TEST_LOG_DIR=dir keeps every process's
// whole log, under dir/<test name>/.
package testkit
