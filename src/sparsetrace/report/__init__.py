"""sparsetrace.report"""
