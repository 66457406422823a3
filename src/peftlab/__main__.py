from peftlab.cli import app

app(prog_name="peftlab")
