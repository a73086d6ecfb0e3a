public class Smoke {
    public static void main(String[] args) {
        System.out.println("hello from java " + (2 + 2));
    }
}
