"""sparsetrace.intervene"""
