"""sparsetrace.attribute"""
