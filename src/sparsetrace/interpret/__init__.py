"""sparsetrace.interpret"""
