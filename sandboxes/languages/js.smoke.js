const total = [1, 3].reduce((a, b) => a + b, 0);
console.log(`hello from javascript ${total}`);
