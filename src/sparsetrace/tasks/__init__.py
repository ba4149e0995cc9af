"""sparsetrace.tasks"""
