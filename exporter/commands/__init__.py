"""The Click commands, one module per stage; each is a thin layer over the stage's library function."""
