from llmray import logs

logs.drop_import_noise()
