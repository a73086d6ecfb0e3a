package main

import "fmt"

func main() {
	fmt.Println("hello from go", 2+2)
}
