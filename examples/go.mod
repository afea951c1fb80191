module github.com/kagzi/kagzi/examples

go 1.26

require github.com/kagzi/kagzi/libs v0.0.0

replace (
	github.com/kagzi/kagzi/libs => ../libs
	github.com/kagzi/kagzi/migrations => ../migrations
)
