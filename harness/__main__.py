from harness.cli.commands import app

app(prog_name="forgebench")
