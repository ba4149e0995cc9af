"""sparsetrace.evaluate"""
