"""sparsetrace.train"""
