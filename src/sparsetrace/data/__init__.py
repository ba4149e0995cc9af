"""sparsetrace.data"""
