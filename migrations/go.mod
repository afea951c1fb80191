module github.com/kagzi/kagzi/migrations

go 1.26
