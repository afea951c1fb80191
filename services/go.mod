module github.com/kagzi/kagzi/services

go 1.26
