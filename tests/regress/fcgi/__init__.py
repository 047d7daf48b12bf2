"""FastCGI servers for the httpd regress tests (and the benchmark).

servers.py starts and stops real FastCGI servers (flup, php-fpm, fcgiwrap)
and a misbehaving stub; flup_app.py and stub.py are what those processes
run; php/ and cgi/ hold the scripts the tests copy into their roots.
"""
