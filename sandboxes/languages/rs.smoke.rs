fn main() {
    let v = vec![1, 3];
    println!("hello from rust {}", v.iter().sum::<i32>());
}
