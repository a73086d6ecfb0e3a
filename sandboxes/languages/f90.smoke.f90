program smoke
  implicit none
  print '(a,i0)', 'hello from fortran ', 2 + 2
end program smoke
