"""Every language through ``POST /exec`` on one real server: smoke, errors, args, stdin, unicode, timeouts.

Each behaviour is a table of one small program per language, parametrized over the language files, so a
new ``<code>.toml`` without its programs here fails ``test_every_language_has_programs`` first.
"""

from __future__ import annotations

import textwrap
import time
from typing import Any

import httpx
import pytest

from interpreter.resources import sandboxes_dir
from sandboxes.languages import load_languages
from tests.conftest import ServerProcess

pytestmark = pytest.mark.nsjail

LANGUAGES_DIR = sandboxes_dir() / "languages"
SPECS = load_languages(LANGUAGES_DIR)
CODES = sorted(SPECS)


def src(text: str) -> str:
    return textwrap.dedent(text).lstrip("\n")


# --- compile errors (syntax errors for interpreted languages): (program, diagnostic expected in the output)
COMPILE_ERROR: dict[str, tuple[str, str]] = {
    "py": ("def broken(:\n    pass\n", "SyntaxError"),
    "js": ("function (\n", "SyntaxError"),
    "ts": ('const x: number = "text";\nconsole.log(x);\n', "error TS2322"),  # tsc reports on stdout
    "bash": ("if then fi\n", "syntax error"),
    "php": ('<?php\necho "a"\n', "Parse error"),
    "r": ("x <- (1 +\n", "unexpected end of input"),
    "c": ("int main(void) { return undeclared; }\n", "undeclared"),
    "cpp": ("int main() { return undeclared; }\n", "was not declared"),
    "d": ('void main() { int x = "text"; }\n', "Error"),
    "f90": ("program p\n  x =\nend program p\n", "Error"),
    "go": ("package main\n\nfunc main() { undefinedFunction() }\n", "undefined"),
    "java": ('public class Code {\n    public static void main(String[] a) { int x = "text"; }\n}\n', "error:"),
    "rs": ('fn main() {\n    let x: i32 = "text";\n}\n', "error[E0308]"),
}

# --- runtime errors: (program, exit code, text expected in stderr). SIGNALLED: killed by a signal, 128 + n.
SIGNALLED = -1
RUNTIME_ERROR: dict[str, tuple[str, int, str]] = {
    "py": ("print('partial')\n1 / 0\n", 1, "ZeroDivisionError"),
    "js": ("console.log('partial');\nthrow new Error('boom');\n", 1, "Error: boom"),
    "ts": ("console.log('partial');\nthrow new Error('boom');\n", 1, "Error: boom"),
    "bash": ("echo partial\necho boom >&2\nexit 3\n", 3, "boom"),
    "php": ('<?php\necho "partial\\n";\necho intdiv(1, 0);\n', 255, "DivisionByZeroError"),
    "r": ('cat("partial\\n")\nstop("boom")\n', 1, "boom"),
    "c": (
        src("""
            #include <stdio.h>
            #include <stdlib.h>
            int main(void) {
                puts("partial");
                fputs("boom\\n", stderr);
                exit(3);
            }
        """),
        3,
        "boom",
    ),
    # An uncaught exception ends in std::terminate -> abort(): which signal is test_signal_deaths' business.
    "cpp": (
        src("""
            #include <iostream>
            #include <stdexcept>
            int main() {
                std::cout << "partial" << std::endl;
                throw std::runtime_error("boom");
            }
        """),
        SIGNALLED,
        "boom",
    ),
    "d": (
        src("""
            import std.stdio;
            void main() {
                writeln("partial");
                stdout.flush();
                throw new Exception("boom");
            }
        """),
        1,
        "boom",
    ),
    "f90": ("program p\n  print '(a)', 'partial'\n  error stop 3\nend program p\n", 3, "ERROR STOP 3"),
    "go": (
        'package main\n\nimport "fmt"\n\nfunc main() {\n\tfmt.Println("partial")\n\tpanic("boom")\n}\n',
        2,
        "panic: boom",
    ),
    "java": (
        src("""
            public class Code {
                public static void main(String[] args) {
                    System.out.println("partial");
                    throw new IllegalStateException("boom");
                }
            }
        """),
        1,
        "IllegalStateException: boom",
    ),
    "rs": ('fn main() {\n    println!("partial");\n    panic!("boom");\n}\n', 101, "boom"),
}

# --- print each command-line argument as [arg], one per line
ARGS: dict[str, str] = {
    "py": 'import sys\nfor a in sys.argv[1:]:\n    print(f"[{a}]")\n',
    "js": "for (const a of process.argv.slice(2)) console.log(`[${a}]`);\n",
    "ts": "for (const a of process.argv.slice(2)) console.log(`[${a}]`);\n",
    "bash": 'for a in "$@"; do echo "[$a]"; done\n',
    "php": '<?php\nforeach (array_slice($argv, 1) as $a) echo "[$a]\\n";\n',
    "r": 'for (a in commandArgs(trailingOnly = TRUE)) cat("[", a, "]\\n", sep = "")\n',
    "c": src("""
        #include <stdio.h>
        int main(int argc, char **argv) {
            for (int i = 1; i < argc; i++) printf("[%s]\\n", argv[i]);
            return 0;
        }
    """),
    "cpp": src("""
        #include <iostream>
        int main(int argc, char **argv) {
            for (int i = 1; i < argc; i++) std::cout << "[" << argv[i] << "]\\n";
        }
    """),
    "d": 'import std.stdio;\n\nvoid main(string[] args) {\n    foreach (a; args[1 .. $]) writeln("[", a, "]");\n}\n',
    "f90": src("""
        program args
          implicit none
          integer :: i, n
          character(len=200) :: arg
          do i = 1, command_argument_count()
            call get_command_argument(i, arg, n)
            print '(3a)', '[', arg(1:n), ']'
          end do
        end program args
    """),
    "go": src("""
        package main

        import (
            "fmt"
            "os"
        )

        func main() {
            for _, a := range os.Args[1:] {
                fmt.Printf("[%s]\\n", a)
            }
        }
    """),
    "java": src("""
        public class Code {
            public static void main(String[] args) {
                for (String a : args) System.out.println("[" + a + "]");
            }
        }
    """),
    "rs": 'fn main() {\n    for a in std::env::args().skip(1) {\n        println!("[{}]", a);\n    }\n}\n',
}

# --- read standard input to EOF, print each line as [line], then "end"
STDIN: dict[str, str] = {
    "py": 'import sys\nfor line in sys.stdin.read().splitlines():\n    print(f"[{line}]")\nprint("end")\n',
    "js": src("""
        const data = require("fs").readFileSync(0, "utf8");
        for (const line of data.split("\\n").filter((l) => l !== "")) console.log(`[${line}]`);
        console.log("end");
    """),
    "ts": src("""
        import { readFileSync } from "fs";
        const data: string = readFileSync(0, "utf8");
        for (const line of data.split("\\n").filter((l) => l !== "")) console.log(`[${line}]`);
        console.log("end");
    """),
    "bash": 'while IFS= read -r line; do echo "[$line]"; done\necho end\n',
    "php": '<?php\nwhile (($line = fgets(STDIN)) !== false) echo "[" . rtrim($line, "\\n") . "]\\n";\necho "end\\n";\n',
    "r": 'for (line in readLines(file("stdin"))) cat("[", line, "]\\n", sep = "")\ncat("end\\n")\n',
    "c": src("""
        #include <stdio.h>
        #include <string.h>
        int main(void) {
            char line[256];
            while (fgets(line, sizeof line, stdin)) {
                line[strcspn(line, "\\n")] = 0;
                printf("[%s]\\n", line);
            }
            puts("end");
            return 0;
        }
    """),
    "cpp": src("""
        #include <iostream>
        #include <string>
        int main() {
            std::string line;
            while (std::getline(std::cin, line)) std::cout << "[" << line << "]\\n";
            std::cout << "end\\n";
        }
    """),
    "d": src("""
        import std.stdio;

        void main() {
            foreach (line; stdin.byLine) writeln("[", line, "]");
            writeln("end");
        }
    """),
    "f90": src("""
        program echo
          implicit none
          character(len=200) :: line
          integer :: ios
          do
            read(*, '(a)', iostat=ios) line
            if (ios /= 0) exit
            print '(3a)', '[', trim(line), ']'
          end do
          print '(a)', 'end'
        end program echo
    """),
    "go": src("""
        package main

        import (
            "bufio"
            "fmt"
            "os"
        )

        func main() {
            scanner := bufio.NewScanner(os.Stdin)
            for scanner.Scan() {
                fmt.Printf("[%s]\\n", scanner.Text())
            }
            fmt.Println("end")
        }
    """),
    "java": src("""
        import java.io.BufferedReader;
        import java.io.InputStreamReader;

        public class Code {
            public static void main(String[] args) throws Exception {
                BufferedReader in = new BufferedReader(new InputStreamReader(System.in));
                for (String line; (line = in.readLine()) != null; ) System.out.println("[" + line + "]");
                System.out.println("end");
            }
        }
    """),
    "rs": src("""
        use std::io::BufRead;

        fn main() {
            for line in std::io::stdin().lock().lines() {
                println!("[{}]", line.unwrap());
            }
            println!("end");
        }
    """),
}

UNICODE_TEXT = "héllo ✓ 日本"
UNICODE: dict[str, str] = {
    "py": f'print("{UNICODE_TEXT}")\n',
    "js": f'console.log("{UNICODE_TEXT}");\n',
    "ts": f'console.log("{UNICODE_TEXT}");\n',
    "bash": f'echo "{UNICODE_TEXT}"\n',
    "php": f'<?php\necho "{UNICODE_TEXT}\\n";\n',
    "r": f'cat("{UNICODE_TEXT}\\n")\n',
    "c": f'#include <stdio.h>\nint main(void) {{ puts("{UNICODE_TEXT}"); return 0; }}\n',
    "cpp": f'#include <iostream>\nint main() {{ std::cout << "{UNICODE_TEXT}" << std::endl; }}\n',
    "d": f'import std.stdio;\n\nvoid main() {{ writeln("{UNICODE_TEXT}"); }}\n',
    "f90": f"program u\n  print '(a)', '{UNICODE_TEXT}'\nend program u\n",
    "go": f'package main\n\nimport "fmt"\n\nfunc main() {{ fmt.Println("{UNICODE_TEXT}") }}\n',
    "java": f'class Code {{\n    public static void main(String[] a) {{ System.out.println("{UNICODE_TEXT}"); }}\n}}\n',
    "rs": f'fn main() {{\n    println!("{UNICODE_TEXT}");\n}}\n',
}

# --- print "before" (flushed), then spin forever
TIMEOUT: dict[str, str] = {
    "py": 'print("before", flush=True)\nwhile True:\n    pass\n',
    "js": 'console.log("before");\nfor (;;) {}\n',
    "ts": 'console.log("before");\nfor (;;) {}\n',
    "bash": "echo before\nwhile :; do :; done\n",
    "php": '<?php\necho "before\\n";\nwhile (true) {}\n',
    "r": 'cat("before\\n")\nflush(stdout())\nrepeat {}\n',
    "c": src("""
        #include <stdio.h>
        int main(void) {
            volatile unsigned long n = 0;
            puts("before");
            fflush(stdout);
            for (;;) n++;
        }
    """),
    "cpp": src("""
        #include <iostream>
        int main() {
            volatile unsigned long n = 0;
            std::cout << "before" << std::endl;
            for (;;) n++;
        }
    """),
    "d": 'import std.stdio;\n\nvoid main() {\n    writeln("before");\n    stdout.flush();\n    while (true) {}\n}\n',
    "f90": "program t\n  print '(a)', 'before'\n  flush(6)\n  do\n  end do\nend program t\n",
    "go": 'package main\n\nimport "fmt"\n\nfunc main() {\n\tfmt.Println("before")\n\tfor {\n\t}\n}\n',
    "java": src("""
        public class Code {
            public static void main(String[] args) {
                System.out.println("before");
                while (true) {}
            }
        }
    """),
    "rs": 'fn main() {\n    println!("before");\n    loop {}\n}\n',
}

TABLES: dict[str, dict[str, Any]] = {
    "COMPILE_ERROR": COMPILE_ERROR,
    "RUNTIME_ERROR": RUNTIME_ERROR,
    "ARGS": ARGS,
    "STDIN": STDIN,
    "UNICODE": UNICODE,
    "TIMEOUT": TIMEOUT,
}


def output(result: dict[str, Any]) -> str:
    status = f"status={result['status']} exit_code={result['exit_code']}"
    return f"{status}\nstdout={result['stdout']!r}\nstderr={result['stderr']!r}"


def test_every_language_has_programs() -> None:
    assert len(CODES) == 13
    for name, table in TABLES.items():
        assert set(table) == set(CODES), name


@pytest.mark.parametrize("code", CODES)
def test_smoke_program(server: ServerProcess, code: str) -> None:
    spec = SPECS[code]
    result = server.exec((LANGUAGES_DIR / spec.smoke).read_text(), code)
    assert result["status"] == "ok", output(result)
    assert result["exit_code"] == 0
    assert spec.smoke_expect in result["stdout"]
    assert result["language"] == code
    assert result["truncated"] is False


@pytest.mark.parametrize("code", CODES)
def test_compile_error(server: ServerProcess, code: str) -> None:
    program, diagnostic = COMPILE_ERROR[code]
    result = server.exec(program, code)
    assert result["status"] == "error", output(result)
    assert result["exit_code"] not in (0, None)
    assert diagnostic in result["stderr"] + result["stdout"], output(result)


@pytest.mark.parametrize("code", CODES)
def test_runtime_error(server: ServerProcess, code: str) -> None:
    program, exit_code, message = RUNTIME_ERROR[code]
    result = server.exec(program, code)
    assert result["status"] == "error", output(result)
    assert result["stdout"] == "partial\n", output(result)  # output before the failure is kept
    assert message in result["stderr"], output(result)
    if exit_code == SIGNALLED:
        assert result["exit_code"] > 128, output(result)
    else:
        assert result["exit_code"] == exit_code, output(result)


# /bin/sh stays PID 1 of the jail and the program is its child, so a program can signal itself like
# anywhere else: abort() is 134, raise(SIGTERM) and kill -TERM $$ are 143.
SIGNAL_DEATHS = [
    pytest.param("c", "#include <stdlib.h>\nint main(void) { abort(); }\n", 134, id="c-abort"),
    pytest.param("cpp", RUNTIME_ERROR["cpp"][0], 134, id="cpp-uncaught-exception"),
    pytest.param("c", "#include <signal.h>\nint main(void) { raise(SIGTERM); return 5; }\n", 143, id="c-raise-sigterm"),
    pytest.param("bash", "kill -TERM $$\necho survived\nexit 4\n", 143, id="bash-kill-self"),
]


@pytest.mark.parametrize(("code", "program", "exit_code"), SIGNAL_DEATHS)
def test_signal_deaths(server: ServerProcess, code: str, program: str, exit_code: int) -> None:
    result = server.exec(program, code)
    assert result["status"] == "error", output(result)
    assert result["exit_code"] == exit_code, output(result)


@pytest.mark.parametrize("code", CODES)
def test_args_arrive_intact(server: ServerProcess, code: str) -> None:
    result = server.exec(ARGS[code], code, args=["a b", "c"])
    assert result["status"] == "ok", output(result)
    assert result["stdout"] == "[a b]\n[c]\n", output(result)
    single = server.exec(ARGS[code], code, args="x  y*")  # a plain string is one argument, unexpanded
    assert single["stdout"] == "[x  y*]\n", output(single)


@pytest.mark.parametrize("code", CODES)
def test_stdin(server: ServerProcess, code: str) -> None:
    empty = server.exec(STDIN[code], code, timeout=5000)  # no stdin: EOF at once; a hang would be "timeout"
    assert empty["status"] == "ok", output(empty)
    assert empty["stdout"] == "end\n", output(empty)
    given = server.exec(STDIN[code], code, stdin="x\ny\n")
    assert given["status"] == "ok", output(given)
    assert given["stdout"] == "[x]\n[y]\nend\n", output(given)


@pytest.mark.parametrize("code", CODES)
def test_unicode_output(server: ServerProcess, code: str) -> None:
    result = server.exec(UNICODE[code], code)
    assert result["status"] == "ok", output(result)
    assert result["stdout"] == UNICODE_TEXT + "\n", output(result)


def just_after_a_second_boundary() -> None:
    """Wait (at most half a second) until the wall clock's second has just begun.

    nsjail's --time_limit counts whole seconds of time() and checks once right after starting the jail, so
    a 1 s limit kills at once, before any output, when that start straddles a second boundary (about 1 run
    in 20; reported, not fixed here). Starting early in a second keeps this test about the timeout itself.
    """
    fraction = time.time() % 1
    if fraction > 0.5:
        time.sleep(1.02 - fraction)


@pytest.mark.parametrize("code", CODES)
def test_timeout_keeps_partial_output(server: ServerProcess, code: str) -> None:
    multiplier = SPECS[code].timeout_multiplier
    wall_s = max(1, round(multiplier))  # what the runner gives a 1 s request (Runner.limits_for)
    if wall_s == 1:
        just_after_a_second_boundary()
    result = server.exec(TIMEOUT[code], code, timeout=1000, timeout_s=30)
    assert result["status"] == "timeout", output(result)
    assert result["stdout"] == "before\n", output(result)  # partial output is never lost
    assert 900 * wall_s <= result["duration_ms"] < 1000 * multiplier + 5000, output(result)
    assert f"timed out after {wall_s} s" in result["stderr"], output(result)


JAVA_SOLVER = src("""
    import java.util.List;

    public class Solver {
        public static void main(String[] args) {
            System.out.println("solver " + List.of(1, 2, 3).size());
        }
    }
""")

JAVA_NO_PUBLIC = src("""
    class Prog {
        public static void main(String[] args) {
            System.out.println("no public class");
        }
    }
""")


JAVA_HELPER_FIRST = src("""
    class Node {
        int value = 7;
    }

    class Solution {
        public static void main(String[] args) {
            System.out.println("helper first " + new Node().value);
        }
    }
""")

JAVA_PACKAGE = src("""
    package demo;

    public class App {
        public static void main(String[] args) {
            System.out.println("in a package");
        }
    }
""")


@pytest.mark.parametrize(
    ("program", "expected"),
    [
        pytest.param(JAVA_SOLVER, "solver 3\n", id="public-Solver"),
        pytest.param(JAVA_NO_PUBLIC, "no public class\n", id="no-public"),
        pytest.param(
            JAVA_HELPER_FIRST,
            "helper first 7\n",
            id="no-public-helper-first",
        ),
        pytest.param(
            JAVA_PACKAGE,
            "in a package\n",
            id="package",
        ),
    ],
)
def test_java_class_naming(server: ServerProcess, program: str, expected: str) -> None:
    result = server.exec(program, "java")
    assert result["status"] == "ok", output(result)
    assert result["stdout"] == expected


def test_c_links_libm(server: ServerProcess) -> None:
    program = src("""
        #include <math.h>
        #include <stdio.h>
        #include <stdlib.h>
        int main(int argc, char **argv) {
            double x = atof(argv[1]);  /* not a constant: the calls cannot be folded away */
            printf("%.4f %.1f %.4f\\n", sqrt(x), pow(x, 10), log(x));
            return 0;
        }
    """)
    result = server.exec(program, "c", args=["2"])
    assert result["status"] == "ok", output(result)
    assert result["stdout"] == "1.4142 1024.0 0.6931\n"


@pytest.mark.parametrize(("lang", "code"), [("PY", "py"), ("Bash", "bash"), (" Js ", "js")])
def test_language_code_is_case_insensitive(server: ServerProcess, lang: str, code: str) -> None:
    program = {"py": "print('hi')\n", "bash": "echo hi\n", "js": "console.log('hi');\n"}[code]
    result = server.exec(program, lang)
    assert result["status"] == "ok", output(result)
    assert result["stdout"] == "hi\n"
    assert result["language"] == code


@pytest.mark.parametrize(
    ("body", "error_code"),
    [
        ({"code": "print(1)", "lang": "cobol"}, "unsupported_language"),
        ({"code": "print(1)", "lang": ""}, "unsupported_language"),
        ({"code": "", "lang": "py"}, "empty_code"),
        ({"code": "  \n\t", "lang": "py"}, "empty_code"),
    ],
)
def test_bad_requests_are_400(server: ServerProcess, body: dict[str, str], error_code: str) -> None:
    response = httpx.post(f"{server.url}/exec", json=body, headers=server.headers, timeout=30)
    assert response.status_code == 400, response.text
    assert response.json()["details"][0]["code"] == error_code
