function add(a: number, b: number): number {
  return a + b;
}
console.log(`hello from typescript ${add(1, 3)}`);
