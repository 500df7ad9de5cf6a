"""The pipeline room: pipeline.yaml's schema, the stage table and its adapters, the caching runner,
`plan`, and the commands that take a pipeline file (serve, verify, bench). The only room that
knows the pipeline's sections; it sequences the stages below it.
"""
