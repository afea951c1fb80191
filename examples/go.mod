module github.com/kagzi/kagzi/examples

go 1.26
