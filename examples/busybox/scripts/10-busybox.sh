#!/bin/busybox sh
# Inside the tree: busybox's applets as links, busybox as init (unless the recipe put
# another /sbin/init in), and the version's welcome line.
set -e
/bin/busybox --install -s /bin
[ -e /sbin/init ] || /bin/busybox ln -s ../bin/busybox /sbin/init
echo "Welcome to the Atom sample OS $ATOM_VERSION" > /etc/motd
