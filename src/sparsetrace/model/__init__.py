"""sparsetrace.model"""
