"""Same as `peftlab bench`: python benchmarks/bench.py [--sections train --methods lora ...]."""

from peftlab.cli import app

if __name__ == "__main__":
    app(["bench", *__import__("sys").argv[1:]], prog_name="bench.py")
