"""sparsetrace.dictionary"""
