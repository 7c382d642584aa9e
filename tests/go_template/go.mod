module forgebench/tests/go_template

go 1.19
